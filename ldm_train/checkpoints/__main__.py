from ldm_train.checkpoints.compvis import main

main()
