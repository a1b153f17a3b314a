"""Operator dashboard: browse a run's saved predictions, tune the threshold, score new images.

`patchcore.dashboard.data` holds the Streamlit-free logic (run discovery, decisions,
overlays, scoring); `app.py` is the Streamlit script and `launch.py` the
`patchcore-dashboard` command that starts it.
"""
