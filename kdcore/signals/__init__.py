"""Teacher signals kept on disk: the store (the teacher's top k, or draws from it) and the bucket
losses that train on it.

- :mod:`~kdcore.signals.store`: the store's files (manifest, shards, digests) and
  :class:`~kdcore.signals.store.StoreReader`;
- :mod:`~kdcore.signals.records`: the coding of one position's record and the checks of its values;
- :mod:`~kdcore.signals.buckets`: a teacher's k kept (or drawn) classes plus one tail bucket, and any
  loss on them.

Running a teacher to fill a store (``kdcore capture``) and the in-memory cache of a teacher's outputs
belong to the engine (:mod:`kdcore.engine.capture`, :mod:`kdcore.engine.teacher_source`).

Layer 3: imports :mod:`kdcore.common`, :mod:`kdcore.losses` and :mod:`kdcore.data`; never the engine.
"""
