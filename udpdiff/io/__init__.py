"""Files: video reading and writing, dense maps, the clip manifest, atomic writes."""
