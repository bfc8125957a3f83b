"""A local web page to try converted files on your own photos before shipping them (`nox -s tryout`)."""
