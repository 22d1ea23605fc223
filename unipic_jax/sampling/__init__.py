"""Jitted loops over the models: text generation (text.py), the MAR schedule (schedule.py), and
the image samplers. Every loop has static shapes and compiles once per shape."""
