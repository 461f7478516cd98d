"""Curation: verifiers, filters, selection."""
