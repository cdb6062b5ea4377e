"""Bytes in one pass: the tar format both ways, the tar writer, codecs, hashing, the safe
extractor and the archive pipeline that joins them."""
