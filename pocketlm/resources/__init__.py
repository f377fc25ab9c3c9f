"""Files pocketlm ships: the illustrative sentence pairs of `pocketlm bias`."""
