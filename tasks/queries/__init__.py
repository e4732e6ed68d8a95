"""The query list: CLIP's 500k queries, rebuilt as MetaCLIP does, one module per source.

``unigrams`` (word counts: ``counts`` files or Wikipedia ``dumps`` counted by ``dump_counts``),
``bigrams`` (PMI), ``titles`` (pageviews) and ``wordnet`` each give candidates (a ``source``
result) after ``normalize``; ``merge`` cuts their union to the budget as the ``QUERY_SCHEMA``
table and ``output`` writes it with its manifest. ``flows/queries.py`` wires them as Prefect tasks.
"""
