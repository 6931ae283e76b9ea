"""quantdeck's CPU kernels in C: kernels.c, built once per machine by build.py, called through ctypes by calls.py."""
