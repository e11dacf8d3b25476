"""What travels: the payload byte layout (``payload``) and the only bits/bytes formulas (``accounting``)."""
