"""Exit 0 if the URL's host answers within a few seconds (any HTTP status), else 1 with one line.

    python deploy/reachable.py URL

`make setup` asks it before adding an extra package index: pip retries an unreachable index five
times for each package before it falls back to the others."""

import sys
import urllib.error
import urllib.request

url = sys.argv[1]
try:
    urllib.request.urlopen(url, timeout=5).close()
except urllib.error.HTTPError:
    pass  # the host answered
except OSError as e:
    print(f"setup: {url} is unreachable ({e.__class__.__name__}); leaving it out", file=sys.stderr)
    sys.exit(1)
