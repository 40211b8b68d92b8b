"""Test-suite settings: a decoded-image / generated-dataset cache shared by the whole session."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('CURRICULUM_SSL_CACHE', os.path.join(REPO, '.cache', 'tests'))
