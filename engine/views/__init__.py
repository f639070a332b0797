"""What the engine decided and what a run did, as plain data for people and tools.

annotate  the passes' decisions for one graph as a dump document (drawn by graph.drawing)
trace     a run's timeline: spans and instants per stream, timed on the device
"""
