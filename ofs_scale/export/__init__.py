"""Hugging Face export: `ofs-scale export` (convert.py; modelling_ofs.py ships with exports)."""
