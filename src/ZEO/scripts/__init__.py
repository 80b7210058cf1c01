"""Command-line tools shipped with zeo-ng (``zeopack``...)."""
