"""One module per pipeline stage; each has one entry function taking a typed config."""
