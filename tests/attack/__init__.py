"""Attacks on the platform as shipped, found after the holes of issue 10 were closed, each kept as the
test that shows it closed: a lying manifest (A1), a deleted app's logs (A2), a revoked token at the
gateway (A3), a caller's deadline (A4), a deleted app's build caches (A5), volume sizes past the disk
(A6). Each test fails if its fix is taken out."""
