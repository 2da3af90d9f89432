"""Every configuration key with its default: the IVT recipe on CUHK-PEDES.

Dataset configs (cuhk.py, icfg.py, rstp.py, demo.py) call `get_config()` here and override only what
differs. One number lives in one place: the model reads image size, stride and text length from here,
the loaders resize position embeddings from here, the tokenizer reports the vocabulary size.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---- data -------------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.name = 'cuhk_pedes'          # TFDS builder: cuhk_pedes | icfg_pedes | rstpreid
  c.data.manual_dir = '~/data/CUHK-PEDES'  # the user's copy: reid_raw.json + imgs/
  c.data.data_dir = ''                # prepared TFDS data; '' = <workdir>/tfds; may be gs://BUCKET/...
  c.data.local_cache_dir = ''         # local copy of gs:// prepared data; '' = $IVT_CACHE_DIR or ~/.cache/ivt_jax
  c.data.skip_bad_records = False     # True: skip (and report) bad records instead of failing
  c.data.synthetic = ml_collections.ConfigDict()  # SynthPEDES generation when manual_dir is absent
  c.data.synthetic.enabled = False
  c.data.synthetic.num_ids = 0
  c.data.synthetic.images_per_id = 0        # per training identity
  c.data.synthetic.eval_images_per_id = 0   # per val/test identity (0: images_per_id)
  c.data.synthetic.image_size = (0, 0)
  c.data.synthetic.val_ids = 0
  c.data.synthetic.test_ids = 0
  c.data.synthetic.hard_negative_fraction = 0.25
  c.data.synthetic.train_hard_negative_fraction = -1.0  # the training split's alone (-1: as above); val/test unchanged
  c.data.image_size = (384, 128)      # (H, W) after resize
  c.data.text_length = 128            # tokens incl. [CLS]/[SEP]: longer captions are cut (the reference cuts none;
                                      # CUHK-PEDES's real captions: median 28 WordPiece tokens, the longest seen 63)
  c.data.text_buckets = (32, 48, 64, 96)  # a batch is padded to the smallest of these (or text_length) that holds
                                      # its longest text: one compiled step per length (one process)
  c.data.text_packing = False         # training texts packed: padding and dropped text tokens cost nothing
                                      # (ivt_jax.models.packing; IVT head, no train.contrastive_chunk)
  c.data.phrase_text_length = 0       # training positions of the phrase level (0 = text_length; at most it)
  c.data.word_text_length = 0         # training positions of the word level (0 = text_length; at most it)
  c.data.tokenizer = 'wordpiece'      # wordpiece (bert-base-uncased vocab.txt) | sentencepiece (trained)
  c.data.vocab_file = ''              # WordPiece vocab.txt path (required for wordpiece)
  c.data.sentencepiece_vocab_size = 4000
  c.data.sentencepiece_model_type = 'bpe'  # bpe | unigram (a unigram model splits words on small corpora)
  c.data.ids_per_batch = 7            # P identities x K images = samples per step (x3 MLA levels)
  c.data.images_per_id = 4            # K
  c.data.sample_unit = 'caption'      # caption: an epoch runs over (image, caption) pairs as the reference;
                                      # image: over images, one random caption each
  c.data.worker_count = 4             # Grain worker processes (0 = in-process)
  c.data.worker_buffer_size = 2
  c.data.prefetch = 2                 # batches read and placed on the devices ahead of the step (0 = in series:
                                      # each batch made when the step asks for it)
  c.data.val_fraction_ids = 0.0       # carve val identities from train when the dataset has no val
  # augmentation (train only), the reference's
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.pad = 10
  c.data.augment.flip_prob = 0.5
  c.data.augment.erase_prob = 0.5
  c.data.augment.erase_max_area = 1.0 / 3.0  # erased box: up to this fraction of the image (timm; IRRA: 0.4)
  c.data.augment.erase_fill = 'noise'  # noise (timm) | clip_mean (IRRA: CLIP's channel means)
  c.data.bmm_ratio = 0.2              # BMM: drop U{0..floor(ratio*N)} non-CLS tokens per modality
  c.data.bmm_drops = 'uniform'        # uniform: that many drops, U{0..floor(ratio*N)} (the reference) | fixed:
                                      # exactly floor(ratio*N) per row (static: the image tower then runs on
                                      # N - floor(ratio*N) tokens, see model.bmm_tokens)
  c.data.bmm_pattern = 'sample'       # sample: a pattern per sample, level and modality | batch: the reference's,
                                      # one per batch for all image views and one for all texts
  c.data.word_level_max_attrs = 0     # 0 = random subset of any size >= 1
  c.data.mla_levels = ('sentence', 'phrase', 'word')  # MLA levels trained on; ('sentence',) alone = no MLA

  # ---- model ------------------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.head = 'ivt'                # ivt | part | clip
  c.model.width = 768
  c.model.depth = 12
  c.model.num_heads = 12
  c.model.mlp_dim = 3072
  c.model.patch_size = 16
  c.model.stride = 12                 # 12: overlapping patches (CUHK, ICFG); 16 (RSTPReid)
  c.model.vocab_size = 30522          # overwritten from the tokenizer at run time
  c.model.max_text_positions = 512
  c.model.type_vocab_size = 2
  c.model.drop_path = 0.1
  c.model.text_embed_dropout = 0.1    # BERT embedding dropout (hidden_dropout_prob) as the reference
  c.model.ln_eps = 1e-6
  c.model.init_std = 0.02              # truncated-normal std of the blocks' qkv/proj/fc1/fc2 kernels (fresh init)
  c.model.pos_embed_init = 'trunc_normal'  # image pos_embed (fresh init): trunc_normal (std 0.02) | sincos2d
  c.model.text_ln_eps = 1e-12
  c.model.dtype = 'float32'           # compute dtype: float32 | bfloat16 (params stay float32)
  c.model.attention = 'xla'           # xla | cudnn (jax.nn.dot_product_attention implementation)
  c.model.patch_embed = 'auto'        # auto | conv | matmul: the patch convolution's op (auto: matmul on CPU)
  c.model.dense_grad = 'auto'         # auto | rows | xla: the dense layers' backward (auto: rows on CPU, see
                                      # ivt_jax.models.dense; the same numbers)
  c.model.remat = False
  c.model.bmm_tokens = 'remove'       # remove: dropped image tokens taken out of the sequence when data.bmm_drops
                                      # is 'fixed' (exact: the same embeddings and gradients) | mask: always
                                      # masked as keys (the dropped tokens still computed)
  # CLIP's two towers (model.head = 'clip'; ivt_jax/models/clip.py): ViT-B/16 and the 12-layer text transformer.
  # model.patch_size / model.stride give the image tower's patches (CLIP: 16 / 16); dtype, attention, remat apply.
  c.model.clip = ml_collections.ConfigDict()
  c.model.clip.vision_width = 768
  c.model.clip.vision_layers = 12
  c.model.clip.vision_heads = 12
  c.model.clip.embed_dim = 512
  c.model.clip.context_length = 77
  c.model.clip.text_width = 512
  c.model.clip.text_layers = 12
  c.model.clip.text_heads = 8
  c.model.clip.num_classes = 0        # ID classifier rows: set from the training identities when a run starts
  c.model.clip.sdm_weight = 1.0       # the objective: weights of SDM, ID, ITC, CMPM (ivt_jax/objectives/clip.py)
  c.model.clip.id_weight = 1.0
  c.model.clip.itc_weight = 0.0
  c.model.clip.cmpm_weight = 0.0
  c.model.clip.temperature = 0.02     # SDM / ITC logits = cosine / temperature (IRRA: fixed, 0.02)

  # ---- part head (model.head = 'part'; see ivt_jax/models/part.py and ivt_jax/objectives/part.py) -----
  c.part = ml_collections.ConfigDict()
  c.part.num_parts = 8                # K learnable part queries, shared by images and texts
  c.part.depth = 1                    # decoder layers (cross-attention [+ self-attention] + MLP)
  c.part.num_heads = 0                # 0 = model.num_heads
  c.part.mlp_dim = 0                  # 0 = model.mlp_dim
  c.part.self_attention = True        # self-attention among the parts in each decoder layer
  c.part.share_decoder = True         # one decoder for both modalities (False: one per modality)
  c.part.query_init = 'orthogonal'    # orthogonal | normal (std 0.02)
  c.part.weights = 'text'             # text (softmax of an MLP on the text CLS, as PLOT's TDPA) | uniform
  c.part.weight_hidden = 64           # hidden width of that MLP
  c.part.scale = 1.0                  # s: score = cos(g_t, g_i) + s * sum_k w_k cos(p_tk, p_ik)
  c.part.score = 'coarse_fine'        # coarse_fine | coarse (parts computed, scored on CLS only)
  c.part.match_loss = 'sdm'           # part matching on the weighted part similarity: sdm | infonce | cmpm
  c.part.match_weight = 1.0           # 0 = off
  c.part.temperature = 0.02           # tau of sdm / infonce
  c.part.cmr_weight = 1.0             # L_CMR weight; 0 = off
  c.part.cmr_margin = 0.2             # m_0: margin of a part with commonality 0
  c.part.cmr_min_margin = 0.05        # m_min: floor of the margin (a part common to everyone)
  c.part.cmr_negatives = 'semihard'   # semihard (random semi-hard, SSAN family) | hardest
  c.part.commonality = 'clip'         # mean different-identity part cosine -> [0, 1]: clip | affine
  c.part.start_epoch = 0.0            # part losses (match, CMR) count from this epoch on

  # ---- optimisation -----------------------------------------------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'sgd'                # sgd (reference) | adamw | adam (L2 weight decay, as IRRA's torch Adam)
  c.optim.lr = 0.005
  c.optim.bias_lr_factor = 2.0
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8                  # Adam's epsilon (IRRA: 1e-3)
  c.optim.new_layers = ''             # regex of parameter paths trained at new_layer_lr_factor x lr (IRRA: the
  c.optim.new_layer_lr_factor = 1.0   # classifier at 5x); they take precedence over bias_lr_factor
  c.optim.schedule_shape = 'cosine'   # cosine: over all epochs, warmup included (IVT) | warmup_then_cosine (IRRA)
  c.optim.warmup_epochs = 5.0
  c.optim.warmup_init_lr = 5e-5
  c.optim.min_lr = 1e-5
  c.optim.schedule_unit = 'step'      # step: lr at every step on the fractional epoch | epoch: the reference's
                                      # (constant within an epoch, t = 1-based epoch; see ivt_jax/training/optim.py)
  c.optim.grad_clip_norm = 0.0        # 0 = off
  c.train = ml_collections.ConfigDict()
  c.train.contrastive_chunk = 0       # samples per chunk of the exact chunked contrastive gradient (gradient
                                      # cache: activations of one chunk; about 1/3 more compute); 0 = the batch
                                      # at once. Must divide the global batch (ivt_jax/training/chunked.py)
  c.num_epochs = 120.0
  c.total_steps = 0                   # 0 = num_epochs x steps per epoch; > 0 stops there (the schedule
                                      # still spans num_epochs)

  # ---- runtime ----------------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                    # -1 = all remaining devices
  c.mesh.fsdp = 1
  c.mesh.gather_params = True         # with fsdp > 1: every weight gathered over fsdp for the forward (ZeRO-3
                                      # style; a full float32 copy per chip, 0.67 GB for ViT-B + BERT); False:
                                      # XLA chooses what moves, activations too (4.7x the bytes: docs/scaling.md)
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.eval_every_epochs = 5
  c.eval_batch_size = 64
  c.max_checkpoints = 2
  c.num_retrieval_examples = 4        # queries shown in the retrieval picture
  c.init = ml_collections.ConfigDict()  # pretrained weights, applied in this order
  c.init.vit_npz = ''
  c.init.bert = ''
  c.init.ivt = ''
  c.init.clip = ''                    # model.head='clip': OpenAI ViT-B-16.pt, open_clip or Hugging Face CLIPModel
  c.init.allow_random = ''            # comma-separated regexes of params allowed to stay random
  return c
