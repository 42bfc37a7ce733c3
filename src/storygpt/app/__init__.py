"""The web app: `launch` starts Streamlit on page.py, the page itself.
"""

from .launch import find_models, launch

__all__ = ["find_models", "launch"]
