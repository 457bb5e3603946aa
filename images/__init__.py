"""What an L1 VM boots into: an initramfs (``initramfs``, written by ``cpio``) whose ``/init`` (``init.sh``)
mounts the host's root over virtio-fs and starts holecheck's agent (``suite.targets.agent``) on a virtio-serial port."""
