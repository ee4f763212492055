"""The demo: synthetic slides with ground truth (also the test data) and ``openpluto demo``'s steps.

Like ``cli``, this package sits on top of the data flow and may import any stage; no stage imports it.
"""
