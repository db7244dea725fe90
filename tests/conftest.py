import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# The embedded default model is generated on first use; keep the tests' copy out of the user's cache.
os.environ.setdefault("QWEN2AUDIO_HOME", tempfile.mkdtemp(prefix="qwen2audio-test-home-"))
