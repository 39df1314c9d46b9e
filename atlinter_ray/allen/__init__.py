"""The download job: Allen Brain Institute ISH experiments into the npy+json layout."""
