"""A faithful restatement of the published GeminiFusion models (JiaDingCN/GeminiFusion), the yardstick
the tests hold this package's models and ``gemini_kernels.patch`` against.

Transcribed from the published code, lists of streams, inline per-batch fusion loops and all:

* branch ``main``: ``models/modules.py`` (ModuleParallel & co.), ``models/mix_transformer.py``
  (``Attention``), ``models/swin_transformer.py`` (the Swin backbone), ``models/segformer.py``
  (``SegFormerHead``, ``TransformerBackbone``, ``WeTr`` for Swin);
* branch ``DeLiVER``: ``semseg/models/backbones/geminifusion_backbone.py``,
  ``semseg/models/heads/segformer.py``, ``semseg/models/geminifusion.py``.

What needs timm / mmcv is replaced by its definition (``DropPath``, ``trunc_normal_``, mmcv's
``ConvModule`` with BN as its state_dict sees it: ``conv`` without bias, ``bn``); ImageNet loading,
printing and unreachable branches (PatchEmbed's padding of a list, PredictorConv's 4-D input) are left
out; the DeLiVER backbone's four copied stage sections are written as one loop over the stages, the
three copies of the fusion loop as one function (``published_fusion_loop``), statement for statement.
The linspace of the drop-path rates is made on the CPU so that the models also build under
``torch.device("meta")``. Nothing here imports the package under test.
"""
import functools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def trunc_normal_(t, std=1.0):
    return nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0)


def to_2tuple(x):
    return (x, x)


class DropPath(nn.Module):  # timm
    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x.div(keep) * (keep + torch.rand(shape, dtype=x.dtype, device=x.device)).floor_()


def _init_weights(m):
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        fan_out //= m.groups
        m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            m.bias.data.zero_()


# ------------------------------------------------------------------------------ main: models/modules.py
num_parallel = 2


class ModuleParallel(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x_parallel):
        return [self.module(x) for x in x_parallel]


class Additional_One_ModuleParallel(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x_parallel, x_arg):
        if x_arg is None:
            return [self.module(x, None) for x in x_parallel]
        elif isinstance(x_arg, list):
            return [self.module(x_parallel[i], x_arg[i]) for i in range(len(x_parallel))]
        else:
            return [self.module(x_parallel[i], x_arg) for i in range(len(x_parallel))]


class Additional_Two_ModuleParallel(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x_parallel, x_arg1, x_arg2):
        return [self.module(x_parallel[i], x_arg1, x_arg2) for i in range(len(x_parallel))]


class LayerNormParallel(nn.Module):
    def __init__(self, num_features, num_modal=num_parallel):
        super().__init__()
        for i in range(num_modal):
            setattr(self, "ln_" + str(i), nn.LayerNorm(num_features, eps=1e-6))

    def forward(self, x_parallel):
        return [getattr(self, "ln_" + str(i))(x) for i, x in enumerate(x_parallel)]


class Mlp_2(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x


def published_fusion_loop(self, x, B):
    """The inline per-batch loop shared verbatim by the three published forwards (MiT Attention,
    Swin block, DeLiVER Attention); x is the list of the two streams' (B, N, C) maps."""
    new_x0 = []
    new_x1 = []
    for bs in range(B):
        q = x[0][bs].unsqueeze(0)
        judger_input = torch.cat([x[0][bs].unsqueeze(0), x[1][bs].unsqueeze(0)], dim=-1)
        relation_score = self.relation_judger(judger_input)
        noise_k = self.k_noise.weight[0] + q
        noise_v = self.v_noise.weight[0] + q
        k = torch.cat([noise_k, torch.mul(q, relation_score)], dim=0)
        v = torch.cat([noise_v, x[1][bs].unsqueeze(0)], dim=0)
        new_x0.append(x[0][bs] + self.cross_attn_0_to_1(q, k, v)[0].squeeze(0))

        q = x[1][bs].unsqueeze(0)
        judger_input = torch.cat([x[1][bs].unsqueeze(0), x[0][bs].unsqueeze(0)], dim=-1)
        relation_score = self.relation_judger(judger_input)
        noise_k = self.k_noise.weight[1] + q
        noise_v = self.v_noise.weight[1] + q
        k = torch.cat([noise_k, torch.mul(q, relation_score)], dim=0)
        v = torch.cat([noise_v, x[0][bs].unsqueeze(0)], dim=0)
        new_x1.append(x[1][bs] + self.cross_attn_1_to_0(q, k, v)[0].squeeze(0))
    new_x0 = torch.stack(new_x0)
    new_x1 = torch.stack(new_x1)
    x[0] = new_x0
    x[1] = new_x1
    return x


def _add_fusion(self, dim, heads):
    self.cross_heads = heads
    self.cross_attn_0_to_1 = nn.MultiheadAttention(dim, self.cross_heads, dropout=0.0, batch_first=False)
    self.cross_attn_1_to_0 = nn.MultiheadAttention(dim, self.cross_heads, dropout=0.0, batch_first=False)
    self.relation_judger = nn.Sequential(Mlp_2(dim * 2, dim, dim), torch.nn.Softmax(dim=-1))
    self.k_noise = nn.Embedding(2, dim)
    self.v_noise = nn.Embedding(2, dim)


# ------------------------------------------------------------- main / DeLiVER: MiT Attention (identical)
class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                 sr_ratio=1, n_heads=8):
        super().__init__()
        assert dim % num_heads == 0
        self.dim = dim
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.q = ModuleParallel(nn.Linear(dim, dim, bias=qkv_bias))
        self.kv = ModuleParallel(nn.Linear(dim, dim * 2, bias=qkv_bias))
        self.attn_drop = ModuleParallel(nn.Dropout(attn_drop))
        self.proj = ModuleParallel(nn.Linear(dim, dim))
        self.proj_drop = ModuleParallel(nn.Dropout(proj_drop))
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = ModuleParallel(nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio))
            self.norm = LayerNormParallel(dim)
        _add_fusion(self, dim, n_heads)
        self.apply(_init_weights)

    def forward(self, x, H, W):
        B, N, C = x[0].shape
        q = self.q(x)
        q = [q_.reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3) for q_ in q]
        if self.sr_ratio > 1:
            x = [x_.permute(0, 2, 1).reshape(B, C, H, W) for x_ in x]
            x = self.sr(x)
            x = [x_.reshape(B, C, -1).permute(0, 2, 1) for x_ in x]
            x = self.norm(x)
            kv = self.kv(x)
            kv = [kv_.reshape(B, -1, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4) for kv_ in kv]
        else:
            kv = self.kv(x)
            kv = [kv_.reshape(B, -1, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4) for kv_ in kv]
        k, v = [kv[0][0], kv[1][0]], [kv[0][1], kv[1][1]]
        attn = [(q_ @ k_.transpose(-2, -1)) * self.scale for (q_, k_) in zip(q, k)]
        attn = [attn_.softmax(dim=-1) for attn_ in attn]
        attn = self.attn_drop(attn)
        x = [(attn_ @ v_).transpose(1, 2).reshape(B, N, C) for (attn_, v_) in zip(attn, v)]
        x = published_fusion_loop(self, x, B)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


# ------------------------------------------------------------------------ main: models/swin_transformer.py
class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=None, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = ModuleParallel(nn.Linear(in_features, hidden_features))
        self.act = act_layer if act_layer is not None else ModuleParallel(nn.GELU())
        self.fc2 = ModuleParallel(nn.Linear(hidden_features, out_features))
        self.drop = ModuleParallel(nn.Dropout(drop))

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x


def window_partition(x, window_size):
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)


def window_reverse(windows, window_size, H, W):
    B = int(windows.shape[0] / (H * W / window_size / window_size))
    x = windows.view(B, H // window_size, W // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


class WindowAttention(nn.Module):
    def __init__(self, dim, window_size, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads))
        coords_h = torch.arange(self.window_size[0])
        coords_w = torch.arange(self.window_size[1])
        coords = torch.stack(torch.meshgrid([coords_h, coords_w], indexing="ij"))
        coords_flatten = torch.flatten(coords, 1)
        relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]
        relative_coords = relative_coords.permute(1, 2, 0).contiguous()
        relative_coords[:, :, 0] += self.window_size[0] - 1
        relative_coords[:, :, 1] += self.window_size[1] - 1
        relative_coords[:, :, 0] *= 2 * self.window_size[1] - 1
        relative_position_index = relative_coords.sum(-1)
        self.register_buffer("relative_position_index", relative_position_index)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x, mask=None):
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        relative_position_bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(
            self.window_size[0] * self.window_size[1], self.window_size[0] * self.window_size[1], -1)
        relative_position_bias = relative_position_bias.permute(2, 0, 1).contiguous()
        attn = attn + relative_position_bias.unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
            attn = self.softmax(attn)
        else:
            attn = self.softmax(attn)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B_, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim, num_heads, window_size=7, shift_size=0, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
                 drop=0.0, attn_drop=0.0, drop_path=0.0, act_layer=None, norm_layer=LayerNormParallel):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.mlp_ratio = mlp_ratio
        assert 0 <= self.shift_size < self.window_size
        self.norm1 = ModuleParallel(nn.LayerNorm(dim))
        self.attn = Additional_One_ModuleParallel(WindowAttention(
            dim, window_size=to_2tuple(self.window_size), num_heads=num_heads, qkv_bias=qkv_bias,
            qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop))
        self.drop_path = ModuleParallel(DropPath(drop_path)) if drop_path > 0.0 else nn.Identity()
        self.norm2 = ModuleParallel(nn.LayerNorm(dim))
        mlp_hidden_dim = int(dim * mlp_ratio)
        self.mlp = Mlp(in_features=dim, hidden_features=mlp_hidden_dim, act_layer=act_layer, drop=drop)
        self.H = None
        self.W = None
        _add_fusion(self, dim, 8)
        self.apply(_init_weights)

    def forward(self, x, mask_matrix):
        B, L, C = x[0].shape
        H, W = self.H, self.W
        assert L == H * W, "input feature has wrong size"
        shortcut = x
        x = self.norm1(x)
        for i in range(len(x)):
            x[i] = x[i].view(B, H, W, C)
        pad_l = pad_t = 0
        pad_r = (self.window_size - W % self.window_size) % self.window_size
        pad_b = (self.window_size - H % self.window_size) % self.window_size
        for i in range(len(x)):
            x[i] = F.pad(x[i], (0, 0, pad_l, pad_r, pad_t, pad_b))
        _, Hp, Wp, _ = x[0].shape
        if self.shift_size > 0:
            shifted_x = [torch.roll(x[i], shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
                         for i in range(len(x))]
            attn_mask = mask_matrix
        else:
            shifted_x = x
            attn_mask = None
        x_windows = [window_partition(shifted_x[i], self.window_size) for i in range(len(shifted_x))]
        for i in range(len(x_windows)):
            x_windows[i] = x_windows[i].view(-1, self.window_size * self.window_size, C)
        attn_windows = self.attn(x_windows, attn_mask)
        for i in range(len(attn_windows)):
            attn_windows[i] = attn_windows[i].view(-1, self.window_size, self.window_size, C)
        shifted_x = [window_reverse(attn_windows[i], self.window_size, Hp, Wp) for i in range(len(attn_windows))]
        if self.shift_size > 0:
            x = [torch.roll(shifted_x[i], shifts=(self.shift_size, self.shift_size), dims=(1, 2))
                 for i in range(len(shifted_x))]
        else:
            x = shifted_x
        if pad_r > 0 or pad_b > 0:
            for i in range(len(x)):
                x[i] = x[i][:, :H, :W, :].contiguous()
        for i in range(len(x)):
            x[i] = x[i].view(B, H * W, C)
        x = published_fusion_loop(self, x, B)
        x_dp1 = self.drop_path(x)
        for i in range(len(x)):
            x[i] = shortcut[i] + x_dp1[i]
        x_dp2 = self.drop_path(self.mlp(self.norm2(x)))
        for i in range(len(x)):
            x[i] = x[i] + x_dp2[i]
        return x


class PatchMerging(nn.Module):
    def __init__(self, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x, H, W):
        B, L, C = x.shape
        assert L == H * W, "input feature has wrong size"
        x = x.view(B, H, W, C)
        pad_input = (H % 2 == 1) or (W % 2 == 1)
        if pad_input:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x0 = x[:, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, :]
        x3 = x[:, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3], -1)
        x = x.view(B, -1, 4 * C)
        x = self.norm(x)
        x = self.reduction(x)
        return x


class BasicLayer(nn.Module):
    def __init__(self, dim, depth, num_heads, window_size=7, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop=0.0,
                 attn_drop=0.0, drop_path=0.0, norm_layer=LayerNormParallel, downsample=None, use_checkpoint=False):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim=dim, num_heads=num_heads, window_size=window_size,
                                 shift_size=0 if (i % 2 == 0) else window_size // 2, mlp_ratio=mlp_ratio,
                                 qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop, attn_drop=attn_drop,
                                 drop_path=(drop_path[i] if isinstance(drop_path, list) else drop_path),
                                 norm_layer=norm_layer)
            for i in range(depth)])
        if downsample is not None:
            self.downsample = Additional_Two_ModuleParallel(downsample(dim=dim, norm_layer=nn.LayerNorm))
        else:
            self.downsample = None

    def forward(self, x, H, W):
        Hp = int(np.ceil(H / self.window_size)) * self.window_size
        Wp = int(np.ceil(W / self.window_size)) * self.window_size
        img_mask = torch.zeros((1, Hp, Wp, 1), device=x[0].device)
        h_slices = (slice(0, -self.window_size), slice(-self.window_size, -self.shift_size),
                    slice(-self.shift_size, None))
        w_slices = (slice(0, -self.window_size), slice(-self.window_size, -self.shift_size),
                    slice(-self.shift_size, None))
        cnt = 0
        for h in h_slices:
            for w in w_slices:
                img_mask[:, h, w, :] = cnt
                cnt += 1
        mask_windows = window_partition(img_mask, self.window_size)
        mask_windows = mask_windows.view(-1, self.window_size * self.window_size)
        attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        for blk in self.blocks:
            blk.H, blk.W = H, W
            x = blk(x, attn_mask)
        if self.downsample is not None:
            x_down = self.downsample(x, H, W)
            Wh, Ww = (H + 1) // 2, (W + 1) // 2
            return x, H, W, x_down, Wh, Ww
        else:
            return x, H, W, x, H, W


class PatchEmbed(nn.Module):
    def __init__(self, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None):
        super().__init__()
        patch_size = to_2tuple(patch_size)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = ModuleParallel(nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size))
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x):
        _, _, H, W = x[0].size()
        x = self.proj(x)
        if self.norm is not None:
            Wh, Ww = x[0].size(2), x[0].size(3)
            for i in range(len(x)):
                x[i] = x[i].flatten(2).transpose(1, 2)
            x = self.norm(x)
            for i in range(len(x)):
                x[i] = x[i].transpose(1, 2).view(-1, self.embed_dim, Wh, Ww)
        return x


class SwinTransformer(nn.Module):
    def __init__(self, pretrain_img_size=224, patch_size=4, in_chans=3, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
                 drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.2, norm_layer=LayerNormParallel, ape=False,
                 patch_norm=True, out_indices=(0, 1, 2, 3), frozen_stages=-1, use_checkpoint=False):
        super().__init__()
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.out_indices = out_indices
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                      norm_layer=norm_layer if patch_norm else None)
        self.pos_drop = ModuleParallel(nn.Dropout(p=drop_rate))
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]  # cpu: buildable under meta
        self.layers = nn.ModuleList()
        for i_layer in range(self.num_layers):
            self.layers.append(BasicLayer(
                dim=int(embed_dim * 2 ** i_layer), depth=depths[i_layer], num_heads=num_heads[i_layer],
                window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:i_layer]):sum(depths[:i_layer + 1])],
                norm_layer=norm_layer, downsample=PatchMerging if (i_layer < self.num_layers - 1) else None,
                use_checkpoint=use_checkpoint))
        num_features = [int(embed_dim * 2 ** i) for i in range(self.num_layers)]
        self.num_features = num_features
        for i_layer in out_indices:
            self.add_module(f"norm{i_layer}", norm_layer(num_features[i_layer]))

    def forward(self, x):
        x = self.patch_embed(x)
        Wh, Ww = x[0].size(2), x[0].size(3)
        for i in range(len(x)):
            x[i] = x[i].flatten(2).transpose(1, 2)
        x = self.pos_drop(x)
        outs = {}
        for i in range(self.num_layers):
            layer = self.layers[i]
            x_out, H, W, x, Wh, Ww = layer(x, Wh, Ww)
            if i in self.out_indices:
                norm_layer = getattr(self, f"norm{i}")
                x_out = norm_layer(x_out)
                out = [x_out[j].view(-1, H, W, self.num_features[i]).permute(0, 3, 1, 2).contiguous()
                       for j in range(len(x_out))]
                outs[i] = out
        new_x0 = []
        new_x1 = []
        for i in range(4):
            new_x0.append(outs[i][0])
            new_x1.append(outs[i][1])
        return [new_x0, new_x1]


# ---------------------------------------------------------------------------------- main: models/segformer.py
class MLP(nn.Module):
    def __init__(self, input_dim=2048, embed_dim=768):
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x):
        x = x.flatten(2).transpose(1, 2)
        return self.proj(x)


class ConvModule(nn.Module):  # mmcv ConvModule(k=1, norm_cfg=BN) / DeLiVER heads/segformer.py ConvModule
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(True)

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class SegFormerHead(nn.Module):
    def __init__(self, in_channels, embedding_dim=256, num_classes=20):
        super().__init__()
        c1_in_channels, c2_in_channels, c3_in_channels, c4_in_channels = in_channels
        self.linear_c4 = MLP(input_dim=c4_in_channels, embed_dim=embedding_dim)
        self.linear_c3 = MLP(input_dim=c3_in_channels, embed_dim=embedding_dim)
        self.linear_c2 = MLP(input_dim=c2_in_channels, embed_dim=embedding_dim)
        self.linear_c1 = MLP(input_dim=c1_in_channels, embed_dim=embedding_dim)
        self.dropout = nn.Dropout2d(0.1)
        self.linear_fuse = ConvModule(embedding_dim * 4, embedding_dim)
        self.linear_pred = nn.Conv2d(embedding_dim, num_classes, kernel_size=1)

    def forward(self, x):
        c1, c2, c3, c4 = x
        n, _, h, w = c4.shape
        _c4 = self.linear_c4(c4).permute(0, 2, 1).reshape(n, -1, c4.shape[2], c4.shape[3])
        _c4 = F.interpolate(_c4, size=c1.size()[2:], mode="bilinear", align_corners=False)
        _c3 = self.linear_c3(c3).permute(0, 2, 1).reshape(n, -1, c3.shape[2], c3.shape[3])
        _c3 = F.interpolate(_c3, size=c1.size()[2:], mode="bilinear", align_corners=False)
        _c2 = self.linear_c2(c2).permute(0, 2, 1).reshape(n, -1, c2.shape[2], c2.shape[3])
        _c2 = F.interpolate(_c2, size=c1.size()[2:], mode="bilinear", align_corners=False)
        _c1 = self.linear_c1(c1).permute(0, 2, 1).reshape(n, -1, c1.shape[2], c1.shape[3])
        _c = self.linear_fuse(torch.cat([_c4, _c3, _c2, _c1], dim=1))
        x = self.dropout(_c)
        return self.linear_pred(x)


SWIN_SETTINGS = {  # TransformerBackbone
    "swin_tiny": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7),
    "swin_small": dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], window_size=7),
    "swin_large": dict(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=7),
    "swin_large_window12": dict(pretrain_img_size=384, embed_dim=192, depths=[2, 2, 18, 2],
                                num_heads=[6, 12, 24, 48], window_size=12),
    "swin_large_window12_to_1k": dict(pretrain_img_size=384, embed_dim=192, depths=[2, 2, 18, 2],
                                      num_heads=[6, 12, 24, 48], window_size=12),
}


class TransformerBackbone(nn.Module):
    def __init__(self, backbone, drop_path_rate):
        super().__init__()
        self.body = SwinTransformer(ape=False, drop_path_rate=drop_path_rate, patch_norm=True, use_checkpoint=False,
                                    out_indices=(0, 1, 2, 3), **SWIN_SETTINGS[backbone])

    def forward(self, input):
        return self.body(input)


class WeTrSwin(nn.Module):
    """WeTr for the Swin backbones (no ImageNet loading)."""

    def __init__(self, backbone, num_classes=20, dpr=0.1):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_dim = 256
        self.num_parallel = num_parallel
        e = SWIN_SETTINGS[backbone]["embed_dim"]
        self.in_channels = [e, 2 * e, 4 * e, 8 * e]
        self.encoder = TransformerBackbone(backbone, dpr)
        self.decoder = SegFormerHead(in_channels=self.in_channels, embedding_dim=self.embedding_dim,
                                     num_classes=self.num_classes)
        self.alpha = nn.Parameter(torch.ones(self.num_parallel, requires_grad=True))

    def forward(self, x):
        x = self.encoder(x)
        x = [self.decoder(x[0]), self.decoder(x[1])]
        ens = 0
        alpha_soft = F.softmax(self.alpha, dim=0)
        for l in range(self.num_parallel):
            ens += alpha_soft[l] * x[l].detach()
        x.append(ens)
        return x, None


# ------------------------------------------------- DeLiVER: semseg/models/backbones/geminifusion_backbone.py
class DWConv(nn.Module):
    def __init__(self, dim=768):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        x = x.transpose(1, 2).view(B, C, H, W)
        x = self.dwconv(x)
        return x.flatten(2).transpose(1, 2)


class MitMlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = ModuleParallel(nn.Linear(in_features, hidden_features))
        self.dwconv = DWConv(hidden_features)
        self.act = ModuleParallel(act_layer())
        self.fc2 = ModuleParallel(nn.Linear(hidden_features, out_features))
        self.drop = ModuleParallel(nn.Dropout(drop))
        self.apply(_init_weights)

    def forward(self, x, H, W):
        x = self.fc1(x)
        x = [self.dwconv(x[0], H, W), self.dwconv(x[1], H, W)]
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, act_layer=nn.GELU, norm_layer=LayerNormParallel, sr_ratio=1, n_heads=8):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                              proj_drop=drop, sr_ratio=sr_ratio, n_heads=n_heads)
        self.drop_path = ModuleParallel(DropPath(drop_path)) if drop_path > 0.0 else ModuleParallel(nn.Identity())
        self.norm2 = norm_layer(dim)
        self.mlp = MitMlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.apply(_init_weights)

    def forward(self, x, H, W):
        f = self.drop_path(self.attn(self.norm1(x), H, W))
        x = [x_ + f_ for (x_, f_) in zip(x, f)]
        f = self.drop_path(self.mlp(self.norm2(x), H, W))
        x = [x_ + f_ for (x_, f_) in zip(x, f)]
        return x


class OverlapPatchEmbed(nn.Module):
    def __init__(self, img_size=224, patch_size=7, stride=4, in_chans=3, embed_dim=768, num_modal=2):
        super().__init__()
        patch_size = to_2tuple(patch_size)
        self.proj = ModuleParallel(nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride,
                                             padding=(patch_size[0] // 2, patch_size[1] // 2)))
        self.norm = LayerNormParallel(embed_dim, num_modal=num_modal)
        self.apply(_init_weights)

    def forward(self, x):
        x = self.proj(x)
        _, _, H, W = x[0].shape
        x = [x_.flatten(2).transpose(1, 2) for x_ in x]
        x = self.norm(x)
        return x, H, W


mit_settings = {
    "B0": [[32, 64, 160, 256], [2, 2, 2, 2]],
    "B1": [[64, 128, 320, 512], [2, 2, 2, 2]],
    "B2": [[64, 128, 320, 512], [3, 4, 6, 3]],
    "B3": [[64, 128, 320, 512], [3, 4, 18, 3]],
    "B4": [[64, 128, 320, 512], [3, 8, 27, 3]],
    "B5": [[64, 128, 320, 512], [3, 6, 40, 3]],
}


class PredictorConv(nn.Module):
    def __init__(self, embed_dim=384, num_modals=4):
        super().__init__()
        self.num_modals = num_modals
        self.score_nets = nn.ModuleList([
            nn.Sequential(nn.Conv2d(embed_dim, embed_dim, 3, 1, 1, groups=(embed_dim)),
                          nn.Conv2d(embed_dim, 1, 1), nn.Sigmoid())
            for _ in range(num_modals)])

    def forward(self, x, H, W):
        x_ = []
        B, N, C = x[0].shape
        for i in range(self.num_modals - 1):
            input_modal = x[i].view(B, H, W, C).permute(0, 3, 1, 2)
            x_.append(self.score_nets[i](input_modal).permute(0, 2, 3, 1).view(B, N, 1))
        return x_


class GeminiFusionBackbone(nn.Module):
    def __init__(self, model_name="B0", modals=("rgb", "depth", "event", "lidar"), num_heads=(1, 2, 5, 8),
                 mlp_ratios=(4, 4, 4, 4), sr_ratios=(8, 4, 2, 1), qkv_bias=True, qk_scale=None,
                 norm_layer=LayerNormParallel, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, n_heads=8,
                 num_modal=2):
        super().__init__()
        embed_dims, depths = mit_settings[model_name]
        self.num_modals = len(modals)
        self.embed_dims, self.depths = embed_dims, depths
        previous = 3
        for s in range(4):
            patch, stride = (7, 4) if s == 0 else (3, 2)
            setattr(self, f"patch_embed{s + 1}", OverlapPatchEmbed(patch_size=patch, stride=stride, in_chans=previous,
                                                                   embed_dim=embed_dims[s], num_modal=num_modal))
            previous = embed_dims[s]
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]  # cpu: buildable under meta
        cur = 0
        for s in range(4):
            setattr(self, f"block{s + 1}", nn.ModuleList([
                Block(dim=embed_dims[s], num_heads=num_heads[s], mlp_ratio=mlp_ratios[s], qkv_bias=qkv_bias,
                      qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[cur + i],
                      norm_layer=norm_layer, sr_ratio=sr_ratios[s], n_heads=n_heads)
                for i in range(depths[s])]))
            setattr(self, f"norm{s + 1}", norm_layer(embed_dims[s]))
            cur += depths[s]
        if self.num_modals > 2:
            self.extra_score_predictor = nn.ModuleList(
                [PredictorConv(embed_dims[i], self.num_modals) for i in range(len(depths))])
        self.apply(_init_weights)

    def forward(self, x):
        B = x[0].shape[0]
        outs0, outs1 = [], []
        for s in range(1, 5):
            x, H, W = getattr(self, f"patch_embed{s}")(x)
            if self.num_modals > 2:
                x_ext = x[1:]
                x_f = self.tokenselect(x_ext, self.extra_score_predictor[s - 1], H, W)
                x = [x[0], x_f]
            for blk in getattr(self, f"block{s}"):
                x = blk(x, H, W)
            x = getattr(self, f"norm{s}")(x)
            x = [x_.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for x_ in x]
            outs0.append(x[0])
            outs1.append(x[1])
            if self.num_modals > 2 and s < 4:
                x1_f = x[1]
                x_ext = [x_.reshape(B, H, W, -1).permute(0, 3, 1, 2) + x1_f for x_ in x_ext]
                x = [x[0]] + x_ext
        return [outs0, outs1]

    def tokenselect(self, x_ext, module, H, W):
        x_scores = module(x_ext, H, W)
        for i in range(len(x_ext)):
            x_ext[i] = x_scores[i] * x_ext[i] + x_ext[i]
        return functools.reduce(torch.max, x_ext)


class DeliverSegFormerHead(nn.Module):  # DeLiVER semseg/models/heads/segformer.py
    def __init__(self, dims, embed_dim=256, num_classes=19):
        super().__init__()
        for i, dim in enumerate(dims):
            self.add_module(f"linear_c{i + 1}", MLP(dim, embed_dim))
        self.linear_fuse = ConvModule(embed_dim * 4, embed_dim)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)
        self.dropout = nn.Dropout2d(0.1)

    def forward(self, features):
        B, _, H, W = features[0].shape
        outs = [self.linear_c1(features[0]).permute(0, 2, 1).reshape(B, -1, *features[0].shape[-2:])]
        for i, feature in enumerate(features[1:]):
            cf = getattr(self, f"linear_c{i + 2}")(feature).permute(0, 2, 1).reshape(B, -1, *feature.shape[-2:])
            outs.append(F.interpolate(cf, size=(H, W), mode="bilinear", align_corners=False))
        seg = self.linear_fuse(torch.cat(outs[::-1], dim=1))
        return self.linear_pred(self.dropout(seg))


class DeliverGeminiFusion(nn.Module):  # DeLiVER semseg/models/geminifusion.py GeminiFusion
    def __init__(self, backbone="GeminiFusion-B0", num_classes=25, modals=("img", "depth", "event", "lidar"),
                 drop_path_rate=0.0):
        super().__init__()
        _, variant = backbone.split("-")
        self.backbone = GeminiFusionBackbone(variant, modals, drop_path_rate=drop_path_rate, num_modal=len(modals))
        self.modals = modals
        # Published: 256 if "B0"/"B1" in the *split-off name* "GeminiFusion" -- never, so always 512.
        self.decode_head = DeliverSegFormerHead(self.backbone.embed_dims, 512, num_classes)
        self.num_parallel = 2
        self.alpha = nn.Parameter(torch.ones(self.num_parallel, requires_grad=True))

    def forward(self, x):
        x_modals = self.backbone(x)
        outs = []
        for idx in range(self.num_parallel):
            out = self.decode_head(x_modals[idx])
            outs.append(F.interpolate(out, size=x[0].shape[2:], mode="bilinear", align_corners=False))
        ens = 0
        alpha_soft = F.softmax(self.alpha, dim=0)
        for idx in range(self.num_parallel):
            ens += alpha_soft[idx] * outs[idx].detach()
        outs.append(ens)
        return outs
