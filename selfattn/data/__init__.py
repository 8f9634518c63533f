"""Data: where files are (``SELFATTN_DATA_DIR``, ``SELFATTN_HOME``), reading tables, tokenizers, the token
cache, LM streams and labelled batches."""
