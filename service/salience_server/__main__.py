"""`python -m salience_server [flags]`: the server alone, without the client CLI."""

from salience_server.app import serve
from salience_server.settings import parse_args

if __name__ == "__main__":
    serve(parse_args())
