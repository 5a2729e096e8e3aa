"""medvq: find and outline what is abnormal in retinal OCT and MRI scans."""

__version__ = "0.1.0"
