"""Data: the canonical manifest (schema + validation), audio loading, the torch dataset,
corpus statistics, the MELD-ST importer and the synthetic espeak-ng corpus.

Submodules are imported on demand (`from ermgap.data.manifest import read_manifest`) so that
importing the package stays cheap.
"""
