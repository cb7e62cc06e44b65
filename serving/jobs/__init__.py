"""Durable video jobs: the record, its states, and the SQL store that is their truth."""
