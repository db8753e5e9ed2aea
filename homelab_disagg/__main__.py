from homelab_disagg.cli import main

main()
