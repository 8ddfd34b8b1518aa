"""The fault matrix: every fault and bad input ends fast, clearly, and leaves nothing behind.

Each case states its bound in seconds next to it, with the reason; `support.py` holds the
checks every case shares. Run with --tpgate-fault-table FILE to write the time-to-error table.
"""
