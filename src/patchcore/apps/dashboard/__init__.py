"""Operator dashboard: browse a run's saved predictions, tune the threshold, score new images.

`data.py` holds the Streamlit-free logic (run discovery, decisions, overlays, scoring),
`app.py` is the Streamlit script and `launch.py` starts it (`patchcore-dashboard`).
"""
