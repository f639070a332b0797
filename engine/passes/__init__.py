"""The passes: pure functions from a graph (and the options, device spec and costs of a run) to
frozen, printable plan values. Nothing here allocates, touches a device or runs a kernel.

fusion      groups a backend may run as one kernel
scheduler   the stream of every step and the events between streams
memory      one arena, every intermediate at a planned offset
offload     where each weight lives: resident, streamed through a ring, or on the host
plans       the passes in the order a run takes them
"""
