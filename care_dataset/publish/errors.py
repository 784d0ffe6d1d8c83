"""The error every care-publish step raises for input or an option it cannot publish."""


class PublishError(ValueError):
    """A converted folder or an option that cannot be published, with the reason."""
