"""The model registry: lineage of each run (lineage.py), its model card (model_card.py), versions
and stages per model name with a promotion policy and a hash-chained audit log (store.py), stored
with SQLAlchemy, SQLite by default or PostgreSQL.

    from domaintune.registry.store import Registry
    with Registry() as registry:
        version = registry.register("runs/support-intents/20250101-120000-ab12")
        registry.promote(version.name, version.version, "staging")

Nothing is imported here, so that writing lineage does not load the database libraries.
"""
