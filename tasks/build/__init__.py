"""The dataset build's runner: typed records, the work directory, per-shard jobs and the global
reduces between them (``stages``, one function per Prefect task of ``flows/dataset.py``)."""
