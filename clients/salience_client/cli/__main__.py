"""`python -m salience_client.cli`: the `salience` command."""

import sys

from salience_client.cli.entry import main

sys.exit(main())
