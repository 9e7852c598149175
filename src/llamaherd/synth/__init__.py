"""`herd synth`: synthetic training data the 2023 way, from a local model or any OpenAI-compatible teacher.

Recipes: self-chat (Baize, Xu et al. 2023), explain (Orca, Mukherjee et al. 2023; FreeWilly / Stable Beluga),
self-instruct (Wang et al. 2022; Alpaca, Taori et al. 2023). Every recipe talks to a `Teacher` (teacher.py):
the local generation engine or an HTTP endpoint, both behind one interface, with a request cache and an
append-only journal so a killed run resumes without paying twice or losing rows.
"""
