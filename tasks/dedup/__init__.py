"""Deduplication: against the eval sets (decontamination) and within the dataset.

One module per job: ``hashing`` (hashes, thumbnails, flatness, and the copy features, from one
decode), ``mih`` (Hamming-radius search), ``verify`` (thumbnail correlation, within the dataset),
``copy_detect`` (the decontamination detector's features), ``copy_verify`` (its alignment and
colour-aware verification: the only dedup job on torch),
``align`` (affine alignment of thumbnail pairs), ``ann`` (the descriptor lookup), ``alterations``
(the CLIP-paper alteration families the detector is measured against), ``eval_index`` (the
versioned eval-set index), ``eval_overlap`` (matching candidates against it and dropping them),
``overlap_sheet`` (the report a person checks), ``within`` (exact and near duplicates across the
whole dataset). Each module's docstring says why its steps are there.
"""
