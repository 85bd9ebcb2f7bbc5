"""Signed model bundles: manifest, signatures, the streaming tar reader, the writer."""
