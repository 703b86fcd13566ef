"""The disk tier: `tier` (`DiskTier`: one chunk file per key under a directory per namespace), `index`
(what that directory holds, in memory, rebuilt from it at start), `io` (aligned, atomic, checked file
I/O), `faults` (a full or failing disk: writes pause, reads go on)."""
