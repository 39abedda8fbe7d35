"""Frames and results over ZeroMQ: the wire format (:mod:`wire`) and sockets (:mod:`sockets`)."""
