"""The driver layer of `dcdp.py` (the top of docs/design.md's layers): what a run does around the DCDP
loop. It may import everything below it; nothing below imports it."""
