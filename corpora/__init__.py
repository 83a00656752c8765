"""Named training corpora: where each comes from, its licence and checksum, and how to get it."""
