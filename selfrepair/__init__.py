"""selfrepair: an activation warehouse for self-repair in language models.

    >>> from selfrepair import Store
    >>> Store.open("stores").sql("SELECT layer, avg(sr) FROM self_repair GROUP BY 1")
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import selfrepair` stays cheap and never imports torch.
    if name == "Store":
        from selfrepair.analysis.notebook import Store  # the query layer's Store, with unit pages

        return Store
    if name == "IngestConfig":
        from selfrepair.ingest.config import IngestConfig

        return IngestConfig
    raise AttributeError(name)
