"""Scored datasets on disk: teacher top-k of a run kept as Parquet shards, exported and replayed.

Score once, train many times: `gkd export` writes the scored samples of a run's `ready` stream into a
folder of Parquet shards with a manifest; `gkd replay` feeds them into the `ready` stream of a run (any
number of epochs) without a teacher; `gkd rollouts --skip-scored` leaves out sequences a dataset already
has, and `gkd replay --serve-rollouts` scores rollouts from it by content hash.

Modules: `format` (columns, content hash, Arrow conversion), `manifest` (the commit record),
`writer` (atomic shards), `reader` (epochs), `index` (content-hash index and cache), `exporter` and
`replayer` (the Redis side). pyarrow comes with the `datasets` extra.
"""
