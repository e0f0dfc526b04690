"""Reading, checking and splitting domain data."""
