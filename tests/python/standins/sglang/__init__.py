"""Stand-in of the parts of SGLang that a disaggregation backend touches (see ../README.md)."""
