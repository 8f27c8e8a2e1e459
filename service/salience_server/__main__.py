"""`python -m salience_server [flags]`: the server alone, without the client CLI."""

if __name__ == "__main__":
    from salience_server.logs import import_tensorflow

    # First, so that its start-up lines are written once each, in the server's format.
    import_tensorflow()
    from salience_server.app import serve
    from salience_server.settings import parse_args

    serve(parse_args())
