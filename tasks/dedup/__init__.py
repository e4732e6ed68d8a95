"""Deduplication: against the eval sets (decontamination) and within the dataset.

One module per job: ``hashing`` (hashes, thumbnails, flatness), ``mih`` (Hamming-radius search),
``verify`` (thumbnail correlation), ``eval_index`` (the versioned eval-set index),
``eval_overlap`` (matching candidates against it and dropping them), ``within`` (exact and near
duplicates across the whole dataset). Each module's docstring says why its steps are there.
"""
