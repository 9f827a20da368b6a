"""Tests of tiercache.contrib.django, including Django's own cache backend suite."""
